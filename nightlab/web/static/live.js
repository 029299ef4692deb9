// Keeps the live status current: polls the run's status; reloads the page when a new experiment was recorded.
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  const tag = live.dataset.tag;
  let recorded = Number(live.dataset.recorded);
  async function poll() {
    try {
      const response = await fetch(`/api/runs/${encodeURIComponent(tag)}/status`);
      if (!response.ok) return;
      const status = await response.json();
      if (status.recorded !== recorded) { window.location.reload(); return; }
      for (const running of status.running) {
        const elapsed = live.querySelector(`.running[data-number="${running.number}"] .elapsed`);
        if (elapsed && running.elapsed_seconds !== null) {
          elapsed.textContent = running.elapsed_seconds.toFixed(0);
        }
      }
    } catch (err) { /* the dashboard may be restarting; try again on the next tick */ }
  }
  setInterval(poll, 2000);
})();
