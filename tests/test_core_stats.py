"""Error-bar statistics against hand computations."""

import math

from rlhf_toy.core.stats import difference, is_significant, mean, standard_error


def test_mean_and_standard_error_by_hand():
    """xs = (1, 2, 6): mean 3; squared deviations 4 + 1 + 9 = 14; s^2 = 14 / (3 - 1) = 7;
    se = sqrt(7 / 3) = 1.527525."""
    assert mean([1.0, 2.0, 6.0]) == 3.0
    assert math.isclose(standard_error([1.0, 2.0, 6.0]), math.sqrt(7 / 3), rel_tol=1e-12)
    # two values a, b: s^2 = (a - b)^2 / 2, se = |a - b| / 2
    assert math.isclose(standard_error([0.7, 0.9]), 0.1, rel_tol=1e-12)
    assert standard_error([5.0, 5.0, 5.0]) == 0.0


def test_one_value_has_no_standard_error_and_nothing_is_significant():
    assert math.isnan(standard_error([0.8]))
    assert not is_significant(0.5, standard_error([0.8]))


def test_difference_of_two_means_and_the_two_se_rule():
    """0.80 +- 0.03 against 0.70 +- 0.04: gap 0.10, se sqrt(0.03^2 + 0.04^2) = 0.05, so
    exactly 2 standard errors: significant; 0.09 is 1.8 standard errors: not."""
    diff, se = difference(0.80, 0.03, 0.70, 0.04)
    assert math.isclose(diff, 0.10, abs_tol=1e-12) and math.isclose(se, 0.05, rel_tol=1e-12)
    assert is_significant(0.10, 0.05) and is_significant(-0.10, 0.05)
    assert not is_significant(0.09, 0.05)
    # seeds of two methods, the whole chain: a = (0.9, 0.8, 1.0), b = (0.5, 0.6, 0.4)
    # means 0.9 and 0.5, each se = sqrt(0.01 / 3) = 0.057735; diff se = sqrt(2 * 0.01 / 3)
    a, b = [0.9, 0.8, 1.0], [0.5, 0.6, 0.4]
    diff, se = difference(mean(a), standard_error(a), mean(b), standard_error(b))
    assert math.isclose(diff, 0.4, rel_tol=1e-12)
    assert math.isclose(se, math.sqrt(0.02 / 3), rel_tol=1e-12)
    assert is_significant(diff, se)  # 0.4 / 0.0816 = 4.9 standard errors
