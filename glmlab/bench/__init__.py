"""Built-in benchmarks (``glmlab bench``): whole experiments that train, then measure, as a paper reports them."""
