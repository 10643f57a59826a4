# maverick-ray on Ray's GPU image (Python 3.11, CUDA). Build: docker build -t maverick-ray:latest .
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /opt/maverick-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users maverick_ray ./maverick_ray
COPY --chown=ray:users configs ./configs
# A normal torch from PyPI (CUDA build) satisfies `torch>=2.4`; deepspeed builds against it.
RUN pip install --no-cache-dir "torch>=2.4" && \
    DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation "deepspeed>=0.15" && \
    pip install --no-cache-dir . "huggingface_hub[cli]"
