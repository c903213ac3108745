# One image for every Kiln role (web, worker, reaper, migrate); the command picks the role.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 KILN_STORAGE_ROOT=/data/storage
WORKDIR /srv/kiln
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install -c constraints.txt . \
 && useradd --create-home --uid 1000 kiln && mkdir -p /data/storage && chown -R kiln /data
USER kiln
EXPOSE 8000
CMD ["kiln", "web", "--host", "0.0.0.0", "--port", "8000"]
