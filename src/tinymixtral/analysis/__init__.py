"""Looking inside the router: statistics (stats.py) and their pictures, HTML page and table (report.py)."""
