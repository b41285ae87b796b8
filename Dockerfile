# The operator image: only the light `amxtune` and `amxtune-api` distributions (kopf,
# kubernetes, pydantic).
#   docker build -t amxtune-operator .
# BASE_IMAGE lets machines without registry access build from a locally imported base.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY requirements/pins.txt requirements/pins.txt
COPY api/ api/
COPY operator/ operator/
RUN python -m venv /opt/amxtune/venv \
 && /opt/amxtune/venv/bin/pip install --no-cache-dir -c requirements/pins.txt ./api ./operator

FROM ${BASE_IMAGE}
COPY --from=build /opt/amxtune/venv /opt/amxtune/venv
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin amxtune
ENV PATH=/opt/amxtune/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["amxtune"]
CMD ["operator", "--all-namespaces"]
