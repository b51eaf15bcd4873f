"""`vap dashboard`: every camera live in a browser, read from Kafka alone.

- `state.py`: what the page shows, built from records (sans-I/O, no threads, no Kafka);
- `feed.py`: the Kafka consumer thread that feeds it, and finds the broker again after an outage;
- `web.py`: the HTTP app (page, JSON, server-sent updates, pictures) and its token;
- `static/`: the page itself, with every asset it needs (camera sites are often offline).
"""
