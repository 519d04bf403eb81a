# medgate in a container: docker build -t medgate . && docker run -d --name medgate \
#   -v /etc/medgate/medgate.toml:/etc/medgate/medgate.toml:ro -p 104:104 -p 2575:2575 \
#   -p 9090:9090 medgate
# The config's [gateway] admin must listen on 0.0.0.0:9090 (or another port) for the
# HEALTHCHECK and the status page to be reachable; /healthz and /readyz need no token.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/lib/medgate --create-home \
        --shell /usr/sbin/nologin medgate \
    && mkdir -p /etc/medgate /var/log/medgate \
    && chown medgate:medgate /var/log/medgate

COPY . /src/medgate
# The runtime dependencies at the exact versions and hashes of requirements.lock, then medgate.
RUN pip install --no-cache-dir --require-hashes -r /src/medgate/requirements.lock \
    && pip install --no-cache-dir --no-deps /src/medgate && rm -rf /src/medgate

USER medgate
WORKDIR /var/lib/medgate
# DICOM, DICOM TLS, HL7 MLLP, the admin server
EXPOSE 104 11112 2762 2575 9090

# Ready: listeners open, first health checks done, not draining (503 otherwise).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MEDGATE_ADMIN_PORT', '9090') + '/readyz', timeout=2).status == 200 else 1)"]

# SIGTERM drains; docker stop's 10 s is less than the default drain_timeout (30 s):
# use docker stop -t 40, or set drain_timeout below it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway", "run", "-c", "/etc/medgate/medgate.toml"]
