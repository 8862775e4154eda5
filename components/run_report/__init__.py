"""Run report component: an HTML page with PNGs (PR curves, AP bars, losses, predictions)."""

# Custom property holding the path/URI of a report's index.html; `solov2 runs show` and the local
# run summary print it from whichever artifact carries it.
REPORT_HTML_PROPERTY = "report_html"
