"""The numpy of the reports and jobs: calibration (temperature, calibration error, risk-coverage) and
inspection (duplicates, suspect labels). No TensorFlow and no files here: the modules that draw and
write call these."""
