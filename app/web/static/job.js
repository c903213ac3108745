// The loss charts of a job's page, from the JSON API (the session cookie reads it): one point per
// finished epoch, and the per-step curve the server downsamples (?scope=step&points=N), shown only
// when the job reports step metrics. Both redraw when htmx swaps in a changed status panel (an
// unchanged one is not swapped: static/polling.js).
(function () {
  "use strict";
  if (typeof uPlot === "undefined") return;
  var colors = ["#c0392b", "#2471a3", "#7d3c98", "#1e8449"];

  // Epoch reports: {items: [{epoch, values: {name: value}}]} -> x = epoch, one series per *loss.
  function epochSeries(body) {
    var items = body.items || [];
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

  // Downsampled curves: {series: [{scope, name, points: [[id, epoch, step, value]]}]} -> x = step,
  // the curves aligned on the union of their steps (a gap where a curve has no point).
  function stepSeries(body) {
    var curves = (body.series || []).filter(function (c) { return c.scope === "step" && /loss$/.test(c.name); });
    var steps = {};
    curves.forEach(function (c) { c.points.forEach(function (p) { steps[p[2]] = true; }); });
    var xs = Object.keys(steps).map(Number).sort(function (a, b) { return a - b; });
    var data = [xs];
    curves.forEach(function (c) {
      var at = {};
      c.points.forEach(function (p) { at[p[2]] = p[3]; });
      data.push(xs.map(function (x) { return x in at ? at[x] : null; }));
    });
    return { names: curves.map(function (c) { return c.name; }), data: data };
  }

  function chart(box, xLabel, toSeries, onPoints) {
    var plot = null;
    var drawn = "";
    return function draw() {
      fetch(box.dataset.metricsUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : {}; })
        .then(function (body) {
          var s = toSeries(body);
          var key = JSON.stringify(s.data);
          box.dataset.points = String(s.data[0].length);
          onPoints(s.data[0].length);
          if (key === drawn || s.data[0].length === 0) return;
          drawn = key;
          if (plot) plot.destroy();
          plot = new uPlot({
            width: Math.max(280, Math.min(box.clientWidth || 640, 900)), height: 260,
            scales: { x: { time: false } },
            axes: [{ label: xLabel }, { label: "loss" }],
            series: [{ label: xLabel }].concat(s.names.map(function (n, i) {
              return { label: n, stroke: colors[i % colors.length], width: 2, spanGaps: true,
                       points: { show: xLabel === "epoch" } };
            })),
          }, s.data, box);
        });
    };
  }

  var draws = [];
  var epochBox = document.getElementById("loss-chart");
  if (epochBox) {
    draws.push(chart(epochBox, "epoch", epochSeries, function (n) {
      document.getElementById("loss-empty").hidden = n > 0;
    }));
  }
  var stepBox = document.getElementById("step-loss-chart");
  if (stepBox) {
    draws.push(chart(stepBox, "step", stepSeries, function (n) {
      document.getElementById("step-loss").hidden = n === 0;  // only jobs that report per-step losses
    }));
  }
  function drawAll() { draws.forEach(function (d) { d(); }); }
  drawAll();
  // Only the status panel polls on this page, and it is swapped only when the job changed.
  document.body.addEventListener("htmx:afterSwap", drawAll);
})();
