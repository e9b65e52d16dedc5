"""Data embedded in the package, so the demo and the tests need nothing from a network or another
library: digits.csv.gz is the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin
and C. Kaynak, 1998; CC BY 4.0), 1,797 8x8 images of pixel counts 0..16 with their labels in the
last column, as scikit-learn ships it."""
import os

DIGITS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.csv.gz")
