"""``vlmlab eval``: benchmark datasets, prompt profiles, reference-exact metrics, runner, reports."""
