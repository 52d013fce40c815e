# spine-node's one image recipe, two targets (compose.yaml builds both):
#   node    `spine-node serve`: the DICOM SCP, readiness and the outbox; CPU-only torch (small).
#   worker  `spine-node worker`: grading and delivery; PyPI's torch with its CUDA libraries, so it
#           uses the GPUs the NVIDIA container toolkit gives the container, and the CPU otherwise.
# Both run as the unprivileged user `spine` (uid 10001) and hold the shipped model weights, which
# the wheel carries as package data (models/weights). A build check loads them in each target.
#
#   docker build --target node -t spine-node .
#   docker build --target worker -t spine-node-worker .
#   docker build --target worker --build-arg WORKER_TORCH_INDEX_URL=<a PyTorch CUDA wheel index> .
#     (another CUDA build of torch, e.g. for an older driver)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- base: the runtime every stage starts from ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The same uid in both targets: the node and the workers share the storage volume. The image's
# storage folder, owned by spine, is what Docker copies into a new named volume mounted there.
RUN groupadd --system --gid 10001 spine \
 && useradd --system --uid 10001 --gid spine --home-dir /var/lib/spine-node --no-create-home \
        --shell /usr/sbin/nologin spine \
 && install -d -o spine -g spine -m 0750 /var/lib/spine-node /var/lib/spine-node/storage

# --- requirements: the dependencies alone, so code changes do not reinstall them ----------------
FROM base AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; open('/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && grep -E '^torch([<>=!~ ]|$)' /requirements.txt > /torch-requirement.txt

# --- wheel: the project itself, weights and migrations included as package data ------------------
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node/ node/
COPY worker/ worker/
COPY models/ models/
COPY migrations/ migrations/
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# --- venv-node: CPU-only torch first, so the dependencies do not pull the CUDA build -------------
FROM base AS venv-node
ARG NODE_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=requirements /requirements.txt /torch-requirement.txt /tmp/
RUN python -m venv /opt/spine-node \
 && /opt/spine-node/bin/pip install --index-url "$NODE_TORCH_INDEX_URL" -r /tmp/torch-requirement.txt \
 && /opt/spine-node/bin/pip install -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/spine-node/bin/pip install --no-deps /tmp/wheels/*.whl

# --- venv-worker: PyPI's torch (CUDA libraries as wheels), or another index's ---------------------
FROM base AS venv-worker
ARG WORKER_TORCH_INDEX_URL=
COPY --from=requirements /requirements.txt /torch-requirement.txt /tmp/
RUN python -m venv /opt/spine-node \
 && if [ -n "$WORKER_TORCH_INDEX_URL" ]; then \
        /opt/spine-node/bin/pip install --index-url "$WORKER_TORCH_INDEX_URL" -r /tmp/torch-requirement.txt; \
    fi \
 && /opt/spine-node/bin/pip install -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/spine-node/bin/pip install --no-deps /tmp/wheels/*.whl

# --- node: `spine-node serve` ---------------------------------------------------------------------
FROM base AS node
COPY --from=venv-node /opt/spine-node /opt/spine-node
ENV PATH=/opt/spine-node/bin:$PATH
USER spine
WORKDIR /var/lib/spine-node
# The entry point works and the shipped weights load (their hashes match their model cards).
RUN spine-node config > /dev/null \
 && python -c "from models.detect import Detector; from models.grade import GraderModel; Detector.load(); GraderModel.load()"
EXPOSE 11112 9100
CMD ["spine-node", "serve"]

# --- worker: `spine-node worker` ------------------------------------------------------------------
FROM base AS worker
COPY --from=venv-worker /opt/spine-node /opt/spine-node
ENV PATH=/opt/spine-node/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER spine
WORKDIR /var/lib/spine-node
RUN spine-node config > /dev/null \
 && python -c "from models.detect import Detector; from models.grade import GraderModel; Detector.load(); GraderModel.load()"
EXPOSE 9101
CMD ["spine-node", "worker"]
