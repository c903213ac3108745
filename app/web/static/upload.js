// Dataset upload with a progress bar: the same multipart POST the form makes without JavaScript,
// sent with XMLHttpRequest so its upload progress events can move a <progress> element.
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  if (!form || !window.XMLHttpRequest || !window.FormData) return;
  var box = document.getElementById("upload-progress");
  var bar = document.getElementById("upload-bar");
  var pct = document.getElementById("upload-pct");
  var error = document.getElementById("upload-error");
  var button = form.querySelector("button[type=submit]");
  var limit = parseInt(form.dataset.limit, 10);

  form.addEventListener("submit", function (event) {
    var file = form.elements.file.files[0];
    if (file && limit && file.size > limit) {
      event.preventDefault();
      error.textContent = "The file is larger than the limit stated above.";
      return;
    }
    event.preventDefault();
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.upload.addEventListener("progress", function (e) {
      if (!e.lengthComputable) return;
      var p = Math.round((100 * e.loaded) / e.total);
      bar.value = p;
      bar.textContent = p + "%";
      pct.textContent = p === 100 ? "100% — reading the file…" : p + "%";
    });
    xhr.addEventListener("load", function () {
      // Success answers 303 to the dataset's page, which XMLHttpRequest follows.
      if (xhr.status === 200 && xhr.responseURL && xhr.responseURL.indexOf("/datasets/") !== -1) {
        window.location.assign(xhr.responseURL);
        return;
      }
      var page = new DOMParser().parseFromString(xhr.responseText, "text/html");
      var message = page.getElementById("upload-error") || page.querySelector("main p");
      error.textContent = message ? message.textContent.trim() : "The upload failed (HTTP " + xhr.status + ").";
      box.hidden = true;
      button.disabled = false;
    });
    xhr.addEventListener("error", function () {
      error.textContent = "The upload was interrupted; check the connection and try again.";
      box.hidden = true;
      button.disabled = false;
    });
    error.textContent = "";
    box.hidden = false;
    button.disabled = true;
    xhr.send(new FormData(form));
  });
})();
