"""The one training engine: a resumed run is bit-identical to an uninterrupted one, and a non-finite loss stops
training without publishing. (That a Ray Train worker computes exactly what the in-process engine does is
tests/test_training_ray.py::test_ray_worker_equals_in_process_engine.)"""

import hashlib

import numpy as np
import pytest

from pipeline.data.schema import read_pairs
from pipeline.training import PairData, PairSampler, TrainEngine, TrainingDiverged, train_in_process
from pipeline.training.checkpoint import load_checkpoint, save_checkpoint


def digest(weights: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_sampler_epochs_cover_every_pair_once_per_rank_split():
    seen = []
    for rank in range(2):
        s = PairSampler(10, 2, seed=3, rank=rank, world=2)
        seen.append(np.concatenate([s.next_indices() for _ in range(2)]))  # 2 batches of 2 per rank per epoch
    both = np.concatenate(seen)
    assert len(set(both.tolist())) == 8  # disjoint across ranks; 10 // 2 // 2 = 2 full batches each
    s = PairSampler(10, 2, seed=3)
    first = [s.next_indices().tolist() for _ in range(7)]
    r = PairSampler(10, 2, seed=3)
    [r.next_indices() for _ in range(4)]
    resumed = PairSampler(10, 2, seed=3)
    resumed.load_state_dict(r.state_dict())
    assert [resumed.next_indices().tolist() for _ in range(3)] == first[4:]
    assert first[5] != first[0] or first[6] != first[1]  # epoch 1 is another permutation


def test_in_process_resume_is_bit_identical(tiny_pairs_dataset, tiny_train_config, tmp_path):
    data = PairData.from_table(read_pairs(tiny_pairs_dataset / "pairs"))
    cfg = tiny_train_config(max_steps=6, log_every=1, checkpoint_every=3, torch_threads=1)
    straight = train_in_process(cfg, data)

    first = TrainEngine(tiny_train_config(max_steps=3, log_every=1, checkpoint_every=3, torch_threads=1))
    first.run(data)
    save_checkpoint(first, tmp_path, {"step": first.step})
    second = TrainEngine(cfg)
    load_checkpoint(second, tmp_path, data)
    assert second.step == 3
    second.run(data)
    assert digest(second.policy_weights()) == digest(straight.policy_weights())
    assert [h["loss"] for h in second.history] == [h["loss"] for h in straight.history]
    assert second.history[-1]["resumed_from_step"] == 3 and straight.history[-1]["resumed_from_step"] == 0


def test_nan_loss_stops_with_the_step_and_pair_ids(tiny_pairs_dataset, tiny_train_config):
    data = PairData.from_table(read_pairs(tiny_pairs_dataset / "pairs"))
    data.x0_w[:] = float("nan")  # every pair poisoned in memory (files are checked on read, see test_reliability)
    engine = TrainEngine(tiny_train_config(max_steps=3))
    before = digest(engine.policy_weights())
    with pytest.raises(TrainingDiverged, match=r"optimizer step 1: non-finite loss .*pair ids \['"):
        engine.run(data)
    assert engine.step == 0
    assert digest(engine.policy_weights()) == before  # no update applied


def test_streamed_pairs_cover_each_epoch_once_and_resume_mid_epoch(tiny_pairs):
    """A worker's stream (Ray Data reading the Parquet parts): every pair once per epoch in whole batches, the next
    epoch reshuffled, and a stream restored from (epoch, offset) continues with the batches the first one had left."""
    import ray

    from pipeline.data.schema import TRAIN_SCHEMA, pair_files
    from pipeline.training.engine import PairStream

    files = [str(f) for f in pair_files(tiny_pairs)]
    n = len(read_pairs(tiny_pairs))
    ds = ray.data.read_parquet(files).select_columns(TRAIN_SCHEMA.names)
    ds.context.execution_options.preserve_order = True  # as run_training reads for the workers
    shard = ds.iterator()
    per_epoch = n // 2
    stream = PairStream(shard, 2, seed=1, shuffle_buffer=4)
    epochs = [[tuple(stream.next_batch().pair_ids) for _ in range(per_epoch)] for _ in range(2)]
    for batches in epochs:
        ids = [i for b in batches for i in b]
        assert len(ids) == len(set(ids)) == 2 * per_epoch
    assert epochs[0] != epochs[1]
    assert stream.state_dict() == {"epoch": 1, "offset": per_epoch}
    assert stream.next_batch() and stream.state_dict() == {"epoch": 2, "offset": 1}

    plain = PairStream(shard, 2, seed=1)  # file order: the same on every read
    order = [tuple(plain.next_batch().pair_ids) for _ in range(per_epoch)]
    resumed = PairStream(shard, 2, seed=1)
    resumed.load_state_dict({"epoch": 0, "offset": 1})
    assert [tuple(resumed.next_batch().pair_ids) for _ in range(per_epoch - 1)] == order[1:]
    assert resumed.state_dict() == {"epoch": 0, "offset": per_epoch}

    with pytest.raises(Exception, match="fewer than one batch of 64 pairs"):
        PairStream(shard, 64, seed=1).next_batch()
