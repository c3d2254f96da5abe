# The vtorque image for sites with Docker (or podman with a registry): the same image deploy/compose/build-image.sh
# makes from Debian packages without any registry, built the same way: Debian 12, deploy/compose/packages.txt
# (which includes genisoimage and qemu-utils for the node worker, and RabbitMQ for compose.yaml's broker), a venv
# that sees Debian's python3-libvirt, the locked dependency set by hash, then vtorque itself with no other
# package picked by pip. compose.yaml sets each service's command (`vtorque run bridge|stager|node-worker`).
FROM debian:bookworm-slim
COPY deploy/compose/packages.txt /tmp/packages.txt
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      $(sed -e 's/#.*//' /tmp/packages.txt) \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt
RUN python3 -m venv --system-site-packages /opt/vtorque/venv
COPY requirements.lock /src/requirements.lock
RUN /opt/vtorque/venv/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY services /src/services
COPY hooks /src/hooks
COPY cli /src/cli
RUN /opt/vtorque/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation /src \
 && rm -rf /src
ENV PATH=/opt/vtorque/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 LANG=C.UTF-8
ENTRYPOINT ["vtorque"]
CMD ["run", "bridge"]
