"""The pipeline's stages, one module each: a plain function holding the logic plus a thin Prefect task.

import-model -> build -> export-library -> upload -> load -> set-input -> run -> postprocess
"""
