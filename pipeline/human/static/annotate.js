// The annotation page: ask the server for the next item, show it, send one vote, repeat.
// The page knows only screen positions (left / right); which model made which image stays on the server.
"use strict";
(function () {
  const base = window.location.pathname.replace(/\/+$/, "");
  const $ = (id) => document.getElementById(id);
  let current = null;
  let busy = false;

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  function showProgress(p) {
    $("progress").max = Math.max(p.total, 1);
    $("progress").value = p.done;
    $("progress-text").textContent = p.done + " / " + p.total;
  }

  async function loadNext() {
    const response = await fetch(base + "/next", { cache: "no-store" });
    const data = await response.json();
    if (!response.ok) { showError(data.error || "could not load the next item"); return; }
    showProgress(data.progress);
    current = data.item;
    if (current === null) {
      $("task").hidden = true;
      $("done").hidden = false;
      return;
    }
    $("prompt").textContent = data.prompt;
    $("left").src = data.left;
    $("right").src = data.right;
    $("task").hidden = false;
    busy = false;
  }

  async function vote(choice) {
    if (busy || current === null) return;
    busy = true;
    const response = await fetch(base + "/vote", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ item: current, choice: choice }),
    });
    if (!response.ok && response.status !== 409) {  // 409: already counted (e.g. a second tab); move on
      const data = await response.json().catch(() => ({}));
      showError(data.error || ("the vote was not saved (HTTP " + response.status + ")"));
      busy = false;
      return;
    }
    $("error").hidden = true;
    await loadNext();
  }

  document.querySelectorAll("button[data-choice]").forEach((button) => {
    button.addEventListener("click", () => vote(button.dataset.choice));
  });
  const keys = { a: "left", ArrowLeft: "left", b: "right", ArrowRight: "right", t: "tie", ArrowDown: "tie", s: "skip" };
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const choice = keys[event.key] || keys[event.key.toLowerCase()];
    if (choice) { event.preventDefault(); vote(choice); }
  });
  loadNext().catch((e) => showError(String(e)));
})();
