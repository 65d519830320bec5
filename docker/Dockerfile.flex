# Dataflow Flex Template launcher image for one beam_dl pipeline.
#
# The launcher runs the pipeline module with the template's parameters as
# flags (--input=..., --model_dir=...) to build the job graph, then submits it;
# workers run the SDK worker image (docker/Dockerfile), passed at launch as
# sdk_container_image. FLEX_TEMPLATE_PYTHON_SETUP_FILE also stages the
# project's sdist, so workers of a stock Beam image still get beam_dl.
#
#   docker build -f docker/Dockerfile.flex --build-arg PIPELINE=classify_images \
#       -t $REGION-docker.pkg.dev/$PROJECT/beam-dl/classify-images-launcher:0.1.0 .
#   gcloud dataflow flex-template build gs://$BUCKET/templates/classify_images.json \
#       --image $REGION-docker.pkg.dev/$PROJECT/beam-dl/classify-images-launcher:0.1.0 \
#       --sdk-language PYTHON --metadata-file pipelines/templates/classify_images.json
#
# (see docs/runners.md for the run command).
FROM gcr.io/dataflow-templates-base/python311-template-launcher-base

ARG PIPELINE=classify_images
ARG WORKDIR=/template
WORKDIR ${WORKDIR}

COPY constraints.txt setup.py ./
COPY beam_dl ./beam_dl
COPY transforms ./transforms
COPY pipelines ./pipelines

# The launcher imports the pipeline to build the graph: same pins as workers.
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -c "import pipelines.${PIPELINE}"

ENV FLEX_TEMPLATE_PYTHON_PY_FILE="${WORKDIR}/pipelines/${PIPELINE}.py" \
    FLEX_TEMPLATE_PYTHON_SETUP_FILE="${WORKDIR}/setup.py" \
    JAX_PLATFORMS=cpu \
    TF_CPP_MIN_LOG_LEVEL=2
# Dependencies are in the image already: pip must not fetch them again when
# the launcher stages the sdist.
ENV PIP_NO_DEPS=True
