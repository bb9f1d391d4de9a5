"""covidxray: detect COVID-19 on chest X-rays with deep neural networks.

COVID-19 is the positive class everywhere in this package.
"""

__version__ = "0.1.0"

CLASS_NAMES = ("normal", "covid")  # index 1 is the positive class, COVID-19
POSITIVE_CLASS = "covid"
