#!/bin/sh
# Prometheus scraping the service's metrics listener ($SIGNER_METRICS, host networking).
set -eu
cat > /tmp/prometheus.yml <<CONF
global: {scrape_interval: 5s, evaluation_interval: 5s}
scrape_configs:
  - job_name: signer
    static_configs: [{targets: ["${SIGNER_METRICS:-127.0.0.1:9464}"]}]
  - job_name: prometheus
    static_configs: [{targets: ["${PROMETHEUS_LISTEN:-127.0.0.1:9090}"]}]
CONF
exec prometheus --config.file=/tmp/prometheus.yml --storage.tsdb.path=/var/lib/prometheus \
  --web.listen-address="${PROMETHEUS_LISTEN:-127.0.0.1:9090}" --storage.tsdb.retention.time=2d
