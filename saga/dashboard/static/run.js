// Keeps the run page live: polls the run's state and, when it changed, reloads the part of
// the page that moves (server-rendered and escaped there) in place.
(function () {
  var live = document.getElementById("live");
  if (!live) { return; }
  var base = live.getAttribute("data-run-url");
  var last = null;
  function tick() {
    fetch(base.replace("/runs/", "/api/runs/") + "/state", { cache: "no-store" })
      .then(function (r) { return r.json(); })
      .then(function (doc) {
        var now = JSON.stringify([doc.state, doc.steps, doc.history]);
        if (now !== last) {
          return fetch(base + "/live", { cache: "no-store" })
            .then(function (r) { return r.text(); })
            .then(function (html) { live.innerHTML = html; last = now; });
        }
        last = now;
      })
      .catch(function () {})
      .then(function () { setTimeout(tick, 1000); });
  }
  tick();
})();
