"""`ray job submit --working-dir . -- python jobs/distill.py --config F [key=value ...]` (same as `tailkd distill`)."""

from _entry import run

if __name__ == "__main__":
    run("distill")
