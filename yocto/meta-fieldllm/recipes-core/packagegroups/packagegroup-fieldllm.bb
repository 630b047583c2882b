SUMMARY = "fieldllm: the daemon and its default model"
DESCRIPTION = "Add to IMAGE_INSTALL for an offline LLM appliance: fieldllmd (with its \
               systemd service, sysusers and udev rules) and the SmolLM2 model package."
BUGTRACKER = "https://github.com/fieldllm/fieldllm/issues"
SECTION = "misc"
LICENSE = "MIT"

inherit packagegroup

RDEPENDS:${PN} = "\
    fieldllm-model-smollm2 \
    fieldllmd \
"
