import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the multi-rank launcher and rank functions

pytest_plugins = ["s3_server"]  # the S3 server fixtures (s3_server, s3_bucket, s3_fault_proxy)
