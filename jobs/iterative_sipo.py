"""Online, IPO-style rounds of SIPO (SIPO paper, appendix F.2): roll out, score, pair, train, evaluate.

    ray job submit --working-dir . -- python jobs/iterative_sipo.py [--config FILE] [overrides]
    python jobs/iterative_sipo.py            # embedded default: the toy world on a local Ray instance

The round loop lands with the distributed-training issue; until then this entry point checks which
stages of the pipeline are installed and says what is still missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = [
    ("pipeline.objectives", "preference objectives (Diffusion-DPO, DSPO, DMPO, DDSPO, SDPO, DPO-C&M, SIPO)"),
    ("pipeline.toyworld", "the embedded toy world (prompts, renderer, verifiable reward)"),
    ("pipeline.backbones", "backbones behind one interface (toy reference model, SD/SDXL/flow)"),
    ("pipeline.data", "Ray Data preference-pair generation"),
    ("pipeline.training", "Ray Train (FSDP2) trainer and the round loop"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    missing = []
    for module, what in STAGES:
        try:
            importlib.import_module(module)
            print(f"  ready    {module:<22} {what}")
        except ModuleNotFoundError:
            missing.append(module)
            print(f"  missing  {module:<22} {what}")
    if missing:
        print(f"\nThe iterative SIPO loop needs {len(missing)} more stage(s); see the project's open issues.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
