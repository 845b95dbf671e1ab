"""`ray job submit --working-dir . -- python jobs/score.py --config F [key=value ...]` (same as `tailkd score`)."""

from _entry import run

if __name__ == "__main__":
    run("score")
