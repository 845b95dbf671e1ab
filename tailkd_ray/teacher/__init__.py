"""The teacher (DESIGN §1, §3): ``pool.py``, the actor pool that turns packed blocks into summaries, and
``cache.py``, the Parquet summary cache that keeps one teacher pass for many training runs."""
