# The playground on CPU: `melanoma serve` for one training run, mounted at /run-dir.
#   docker build -t melanoma .
#   docker run --rm -p 8000:8000 -v "$PWD/models/RUN:/run-dir:ro" melanoma
# then open http://127.0.0.1:8000/ui/ (see docs/deployment.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    TF_CPP_MIN_LOG_LEVEL=2 \
    KERAS_BACKEND=tensorflow \
    MPLBACKEND=Agg

WORKDIR /app
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY src ./src
# The versions the tests passed with (requirements.lock; `make lock` refreshes it).
RUN pip install --constraint requirements.lock . \
    && useradd --create-home --uid 10001 melanoma

# Never run as root; the run folder is read-only data.
USER melanoma
VOLUME /run-dir
EXPOSE 8000

# Ready = model loaded and warmed up; start-up (TensorFlow, the model, Gradio) takes a while.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]

CMD ["melanoma", "serve", "--run", "/run-dir", "--host", "0.0.0.0", "--port", "8000"]
