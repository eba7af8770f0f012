"""Views of a Run: plotly figures, the HTML report (and later the dashboard)."""
