from glmlab.training.progress import Progress


def test_status_follows_the_budget_that_ends_first():
    by_time = Progress(total_steps=100_000, max_time=100.0, enabled=False)
    fraction, text = by_time.status(step=500, loss=2.0, tokens_per_sec=25_000, elapsed=25.0, steps_per_sec=20.0)
    assert fraction == 0.25 and text.startswith("step 500 |") and "eta 1:15" in text and "25.0k tok/s" in text
    by_steps = Progress(total_steps=1000, max_time=None, enabled=False)
    by_steps.val = 1.5
    fraction, text = by_steps.status(step=250, loss=2.0, tokens_per_sec=1000, elapsed=10.0, steps_per_sec=25.0)
    assert fraction == 0.25 and "step 250/1000" in text and "val 1.5000" in text and "eta 0:30" in text
