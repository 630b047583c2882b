# nooelint: oelint.var.bbclassextend - architecture-independent data for the target image
SUMMARY = "all-MiniLM-L6-v2 sentence-embedding package for fieldllmd document search"
DESCRIPTION = "The fieldllm package of all-MiniLM-L6-v2 (ONNX graph, tokenizer, manifest with the \
               sha256 of every file) that embeds document passages and questions for fieldllmd's document \
               search, installed where fieldllmd looks for its default embedding model."
# nooelint: oelint.vars.homepageping - CI runs offline
HOMEPAGE = "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2"
BUGTRACKER = "https://github.com/fieldllm/fieldllm/issues"
SECTION = "misc"
CVE_PRODUCT = "all-minilm-l6-v2"
LICENSE = "Apache-2.0"
# the artifact carries no license file (its manifest names Apache-2.0, the model's license)
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# Made on a build host by `models/setup.sh` then `scripts/model-tarball.sh` (the conversion
# needs PyPI packages a Yocto build does not have); put the tarball in files/ next to this
# recipe, or anywhere with FILESEXTRAPATHS:prepend:pn-fieldllm-model-minilm = "DIR:". Every
# file is checked against the manifest's sha256 when fieldllmd loads it.
FIELDLLM_MODEL_TARBALL ?= "all-minilm-l6-v2.tar.gz"
SRC_URI = "file://${FIELDLLM_MODEL_TARBALL};subdir=model"

# Without the tarball this recipe skips itself with a message (base.bbclass's SKIP_RECIPE), so
# a build that merely adds the layer parses and builds everything else: the fetcher's checksum
# of a missing file would stop the whole parse.
SKIP_RECIPE[fieldllm-model-minilm] = "${@'' if bb.utils.which(d.getVar('FILESPATH'), \
    d.getVar('FIELDLLM_MODEL_TARBALL')) else d.getVar('FIELDLLM_MODEL_TARBALL') + \
    ' not found: make it with models/setup.sh and yocto/meta-fieldllm/scripts/model-tarball.sh models/build/all-minilm-l6-v2, \
then put it in this recipe files/ or set FILESEXTRAPATHS:prepend:pn-fieldllm-model-minilm \
to its directory'}"

S = "${WORKDIR}/model"

inherit allarch

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -d ${D}${datadir}/fieldllm/models/all-minilm-l6-v2
    cp -R --no-preserve=ownership ${S}/all-minilm-l6-v2/. \
        ${D}${datadir}/fieldllm/models/all-minilm-l6-v2/
}

FILES:${PN} += "${datadir}/fieldllm/models/all-minilm-l6-v2"
