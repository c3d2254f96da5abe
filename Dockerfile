# One image for all three vtorque services: `vtorque run bridge|stager|node-worker` (compose.yaml sets the command).
# Debian's python3-libvirt is used through --system-site-packages, as on bare metal (no compiler needed).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-libvirt qemu-utils openssh-client \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv --system-site-packages /opt/vtorque/venv
COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY services /src/services
COPY hooks /src/hooks
COPY cli /src/cli
RUN /opt/vtorque/venv/bin/pip install --no-cache-dir /src && rm -rf /src
ENV PATH=/opt/vtorque/venv/bin:$PATH PYTHONUNBUFFERED=1
ENTRYPOINT ["vtorque"]
CMD ["run", "bridge"]
