"""The paper's measures of a generated video (Tables 1-3) and the command that scores videos.

    flow.py     optical flow between adjacent frames (coarse-to-fine Horn-Schunck)
    metrics.py  FCI, warping error, CLIP frame consistency and text alignment, PSNR
    score.py    python -m apla.eval VIDEO: every measure that applies, as a table and JSON
"""
