// The dashboard's only script: confirmations for destructive actions, and an opt-in refresh of
// an instance page that is still running. Pages work without it.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) {
        event.preventDefault();
      }
    });
  }

  const refresh = document.getElementById("auto-refresh");
  if (refresh) {
    const remembered = "durable-dashboard-refresh";
    refresh.checked = window.localStorage.getItem(remembered) === "on";
    let timer = null;
    const schedule = () => {
      window.clearTimeout(timer);
      // Never reload under a user who is typing into a form.
      if (refresh.checked) {
        timer = window.setTimeout(() => {
          if (!document.activeElement || !document.activeElement.closest("form")) {
            window.location.reload();
          } else {
            schedule();
          }
        }, 3000);
      }
    };
    refresh.addEventListener("change", () => {
      window.localStorage.setItem(remembered, refresh.checked ? "on" : "off");
      schedule();
    });
    schedule();
  }
});
