"""`ray job submit --working-dir . -- python jobs/tune.py --config F [key=value ...]` (same as `tailkd tune`)."""

from _entry import run

if __name__ == "__main__":
    run("tune")
