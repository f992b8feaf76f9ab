# GPU image: CUDA PyTorch base + this project. Build: docker build -t lightning-mim .
# Run:   docker run --gpus all --ipc=host -v /data:/data -v $PWD/runs:/workspace/runs lightning-mim \
#          fit --config experiments/mae.yaml --config experiments/trainer/gpu.yaml --data.folder /data
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WANDB_MODE=offline

WORKDIR /workspace

# Dependencies first (cached layer); torch comes from the base image, so it is not reinstalled.
COPY pyproject.toml README.md ./
COPY lightning_mim ./lightning_mim
COPY data_modules ./data_modules
RUN pip install --no-cache-dir .

COPY experiments ./experiments

ENTRYPOINT ["python", "-m", "lightning_mim"]
CMD ["--help"]
