SUMMARY = "fieldllm: the daemon and its default model"
DESCRIPTION = "Add to IMAGE_INSTALL for an offline LLM appliance: fieldllmd (with its \
               systemd service, sysusers and udev rules), the SmolLM2 model package and the \
               all-MiniLM-L6-v2 embedding package for answers from documents."
BUGTRACKER = "https://github.com/fieldllm/fieldllm/issues"
SECTION = "misc"
LICENSE = "MIT"

inherit packagegroup

RDEPENDS:${PN} = "\
    fieldllm-model-minilm \
    fieldllm-model-smollm2 \
    fieldllmd \
"
