// The loss chart of a job's page: epoch metrics from the JSON API (the session cookie reads it),
// one point per finished epoch, redrawn after each htmx refresh of the status panel.
(function () {
  "use strict";
  var box = document.getElementById("loss-chart");
  if (!box || typeof uPlot === "undefined") return;
  var plot = null;
  var drawn = "";

  function series(items) {
    var names = [];
    items.forEach(function (m) {
      Object.keys(m.values).forEach(function (k) {
        if (/loss$/.test(k) && names.indexOf(k) < 0) names.push(k);
      });
    });
    var data = [items.map(function (m) { return m.epoch; })];
    names.forEach(function (k) {
      data.push(items.map(function (m) { return k in m.values ? m.values[k] : null; }));
    });
    return { names: names, data: data };
  }

  function draw() {
    fetch(box.dataset.metricsUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : { items: [] }; })
      .then(function (body) {
        var s = series(body.items);
        var key = JSON.stringify(s.data);
        box.dataset.points = String(s.data[0].length);
        document.getElementById("loss-empty").hidden = s.data[0].length > 0;
        if (key === drawn || s.data[0].length === 0) return;
        drawn = key;
        if (plot) plot.destroy();
        var colors = ["#c0392b", "#2471a3", "#7d3c98", "#1e8449"];
        plot = new uPlot({
          width: Math.max(280, Math.min(box.clientWidth || 640, 900)), height: 260,
          scales: { x: { time: false } },
          axes: [{ label: "epoch" }, { label: "loss" }],
          series: [{ label: "epoch" }].concat(s.names.map(function (n, i) {
            return { label: n, stroke: colors[i % colors.length], width: 2, points: { show: true } };
          })),
        }, s.data, box);
      });
  }

  draw();
  // Only the status panel polls on this page; redraws are deduplicated, so each swap may refetch.
  document.body.addEventListener("htmx:afterSwap", draw);
})();
