"""``--method repa``: REPA (Yu et al., arXiv 2410.06940, github.com/sihyun-yu/REPA).

The student's hidden tokens after block ``encoder_depth`` go through one MLP projector per teacher
and are pulled towards the teacher's patch tokens of the same view by a negative cosine per token,
weighted by ``proj_coeff`` (0.5) next to the flow-matching loss. The base class is exactly this.
"""

from __future__ import annotations

from repa_cache.train.methods.base import Method, MethodOptions


class Repa(Method[MethodOptions]):
    name = "repa"
    summary = "REPA: MLP projector after block encoder_depth, cosine to the teacher's patch tokens (proj_coeff 0.5)"
    source = "arXiv 2410.06940; github.com/sihyun-yu/REPA (loss.py, models/sit.py)"
    repa_weights = True
    sampling_source = "REPA's generate.py SDE sampler, unguided as repa sample has always run it; REPA's best FID: --cfg 1.8"
