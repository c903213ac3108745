// A running generation's text as it arrives, over Server-Sent Events (GET /api/v1/jobs/<id>/stream).
// Progressive enhancement: without JavaScript (or EventSource) the page shows the text once the job ends.
(function () {
  "use strict";
  var box = document.getElementById("generated");
  if (!box || !box.dataset.streamUrl || !window.EventSource) return;
  var source = new EventSource(box.dataset.streamUrl);

  function textOf(index) {
    var el = box.querySelector('pre[data-index="' + index + '"]');
    if (!el) {
      el = document.createElement("pre");
      el.className = "generated";
      el.dataset.index = index;
      box.appendChild(el);
    }
    return el;
  }

  // A new attempt writes the text again from the start.
  source.addEventListener("start", function () { box.textContent = ""; });
  source.addEventListener("token", function (event) {
    var piece = JSON.parse(event.data);
    textOf(piece.index).textContent += piece.text;
  });
  // The job ended: the page's own render now has the final text and result.
  source.addEventListener("end", function () {
    source.close();
    window.location.reload();
  });
})();
