"""The base layer every stage may import and that imports no stage: one-line errors, atomic artifact I/O, the
sha256 manifest, staged builds, and calibration / validation data loading."""
