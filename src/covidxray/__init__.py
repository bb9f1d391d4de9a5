"""covidxray: detect COVID-19 on chest X-rays with deep neural networks.

COVID-19 is the positive class everywhere in this package.
"""

__version__ = "0.1.0"

CLASS_NAMES = ("normal", "covid")  # index 1 is the positive class, COVID-19
POSITIVE_CLASS = "covid"
# Said wherever an answer or a model is shown: CLI, REST API, web page, reports, model card.
DISCLAIMER = ("Research software. Not a medical device: not a diagnosis, and not for triage, screening or any other "
              "clinical decision.")
