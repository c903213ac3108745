// Polled partials carry their answer's ETag as data-version. The browser revalidates each poll with
// If-None-Match and hands htmx its kept copy when the server answers 304; that copy has the version the
// page already shows, so it is not swapped in: the page keeps its DOM, focus and scroll, and nothing
// listening for htmx:afterSwap (the job page's charts) refetches for a change that did not happen.
document.addEventListener("htmx:beforeSwap", function (event) {
  "use strict";
  var target = event.detail.target;
  var shown = target && target.getAttribute && target.getAttribute("data-version");
  if (!shown) return;
  var incoming = /data-version="([^"]*)"/.exec(event.detail.serverResponse || "");
  if (incoming && incoming[1] === shown) event.detail.shouldSwap = false;
});
