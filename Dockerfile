# GPU image: a CUDA build of PyTorch + this project; `python -m lightning_mim` is the entry point.
#   docker build -t lightning-mim .
#   docker run --gpus all --ipc=host -v /data:/data -v "$PWD/runs:/workspace/runs" lightning-mim \
#     fit --config experiments/mae.yaml --config experiments/trainer/gpu.yaml --data.folder /data
# --ipc=host (or a large --shm-size) gives the TorchIO queue workers the shared memory they need.
# On SLURM clusters convert it for Apptainer (`apptainer build mim.sif docker-daemon://lightning-mim:latest`)
# and put `apptainer exec --nv mim.sif` in front of `python` in the sbatch templates (PYTHON variable).
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace

# The base image's CUDA torch satisfies the loose torch requirement of pyproject.toml, so pip keeps it
# (requirements/constraints.txt pins a CPU test pair and is deliberately not used here).
# The recipes and trainer presets are installed with the package (setup.py) and also sit in the
# working directory, so both `--config mae` and `--config experiments/mae.yaml` work.
COPY pyproject.toml setup.py README.md ./
COPY experiments ./experiments
COPY lightning_mim ./lightning_mim
COPY data_modules ./data_modules
RUN pip install --no-cache-dir . \
    && python -c "import lightning_mim.cli, data_modules, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

ENTRYPOINT ["python", "-m", "lightning_mim"]
CMD ["--help"]
