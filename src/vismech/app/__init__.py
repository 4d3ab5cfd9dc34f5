"""The application: the runner (a list of experiments on one model into one run directory), the HTML report,
``inspect`` and the command line. The top layer: it may import everything below and nothing imports it.
"""
