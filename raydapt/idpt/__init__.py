"""Input-dependent prompt tuning (Levine et al., 2022) through the gray-box oracle."""
