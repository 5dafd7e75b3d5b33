# Prometheus from Debian's package on the offline base (compose/build-offline.sh), for machines where
# prom/prometheus cannot be pulled.  apt reaches the Debian mirror the base was made from.
#   docker build --network host --build-arg BASE_IMAGE=diffserve-base:bookworm - < compose/prometheus.Dockerfile
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# wget: the compose healthcheck's probe, as in the official image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/usr/bin/prometheus"]
