# syntax=docker/dockerfile:1
# One image for every camres process: the gateway, the GPU and CPU workers, and Flower.
# The command (see docker-compose.yml) picks the role.
#
#   docker build -t camres .
#
# torch/torchvision are pinned by constraints.txt; on Linux x86_64 that pin resolves to the
# registry's CUDA build, which also runs on CPU-only hosts (the CPU worker, the gateway never
# imports it). The NVIDIA driver comes from the host through the container toolkit.

# --- build: a virtual environment with the pinned dependencies, then the project ----------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so editing the code does not reinstall torch.
COPY pyproject.toml constraints.txt ./
RUN python - <<'EOF' > requirements.txt
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["flower"]))
EOF
RUN pip install --upgrade pip \
    && pip install -c constraints.txt -r requirements.txt

COPY README.md ./
COPY core ./core
COPY service ./service
COPY worker ./worker
COPY cli ./cli
RUN pip install --no-deps . \
    && python -c "import service.app, worker.app, cli.main"

# --- runtime: the environment only, run as an unprivileged user ---------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CAMRES_DATA_DIR=/data \
    CAMRES_HOST=0.0.0.0 \
    CAMRES_PORT=8000

# A fixed uid/gid so files on the shared artifact volume have the same owner in every
# container; /data is created here, owned by that user, so a fresh named volume inherits it.
RUN groupadd --system --gid 10001 camres \
    && useradd --system --uid 10001 --gid camres --home-dir /home/camres --create-home camres \
    && install -d -o camres -g camres /data

COPY --from=build /opt/venv /opt/venv

USER camres
WORKDIR /home/camres
VOLUME ["/data"]
EXPOSE 8000

# The gateway by default; docker-compose.yml overrides the command for the workers and Flower.
CMD ["uvicorn", "--factory", "service.app:create_app", "--host", "0.0.0.0", "--port", "8000", \
     "--proxy-headers", "--no-server-header"]
