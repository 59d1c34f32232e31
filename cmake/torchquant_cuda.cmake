# CUDA kernels of torchquant (csrc/cuda). Included by the top-level
# CMakeLists.txt after find_package(Torch) and add_library(torchquant).
#
# * Torch is a CUDA build (its config defines TORCH_CUDA_LIBRARIES and
#   CAFFE2_USE_CUDA, and has already enabled the CUDA language with the
#   architectures of TORCH_CUDA_ARCH_LIST in CMAKE_CUDA_FLAGS): the CUDA
#   sources are compiled and linked into `torchquant`, which then registers the
#   ops for the CUDA dispatch key, and TORCHQUANT_WITH_CUDA is defined.
#
# * Torch is a CPU-only build but nvcc is installed: the kernels cannot be
#   linked (there is no libc10_cuda / libtorch_cuda) but they can be compiled,
#   and that is worth doing: without it a change that breaks the CUDA code
#   goes unnoticed on every machine without a CUDA torch. So an OBJECT
#   library, torchquant_cuda_compile_check, compiles every file of csrc/cuda
#   (nvcc for the .cu) as part of `all` and is linked into nothing. Its
#   architectures are TORCHQUANT_CUDA_CHECK_ARCHITECTURES (nvcc 13 supports
#   sm_75 and newer). The CPU wheel ships the c10/cuda headers without their
#   generated c10/cuda/impl/cuda_cmake_macros.h (which only carries a Windows
#   DLL export switch); C10_CUDA_NO_CMAKE_CONFIGURE_FILE makes
#   c10/cuda/CUDAMacros.h skip it. The CUDA language is enabled only here,
#   after find_package(Torch), so the CPU build of Torch never sees it.
#
# * Otherwise nothing is added.
#
# Sets TORCHQUANT_CUDA_SOURCES (csrc/cuda/*.cu and *.cpp, the same files
# setup.py adds for a CUDA build) and TORCHQUANT_WITH_CUDA (ON / OFF).

set(_torchquant_csrc "${CMAKE_CURRENT_LIST_DIR}/../csrc")
get_filename_component(_torchquant_csrc "${_torchquant_csrc}" ABSOLUTE)
file(GLOB TORCHQUANT_CUDA_SOURCES CONFIGURE_DEPENDS
     "${_torchquant_csrc}/cuda/*.cu"
     "${_torchquant_csrc}/cuda/*.cpp")
set(TORCHQUANT_WITH_CUDA OFF)

option(TORCHQUANT_CUDA_COMPILE_CHECK
       "Compile (without linking) the CUDA kernels when Torch is a CPU build and nvcc is found" ON)
set(TORCHQUANT_CUDA_CHECK_ARCHITECTURES "80;90" CACHE STRING
    "CUDA architectures of the compile-only check of the CUDA kernels")

# CMake releases before 3.26 do not know nvcc's C++20 flag (nvcc has it
# since CUDA 12). Called once the CUDA language is enabled.
macro(_torchquant_teach_cmake_cuda20)
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION AND
     CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
endmacro()

# The CUDA sources as an OBJECT library with its own options: the flags of
# the C++ library (e.g. -Wall, which nvcc rejects) do not reach nvcc.
function(_torchquant_add_cuda_objects target)
  add_library(${target} OBJECT ${TORCHQUANT_CUDA_SOURCES})
  target_include_directories(${target} PRIVATE "${_torchquant_csrc}" "${_torchquant_csrc}/include")
  # Usage requirements of torch (system include directories, ABI flags);
  # an OBJECT library links nothing itself.
  target_link_libraries(${target} PRIVATE torch)
  set_target_properties(${target} PROPERTIES
    # torch 2.13 headers use C++20, like the rest of the library.
    CUDA_STANDARD 20
    CUDA_STANDARD_REQUIRED ON
    CUDA_EXTENSIONS OFF
    POSITION_INDEPENDENT_CODE ON)
  # The same defines torch.utils.cpp_extension gives nvcc (c10::Half and
  # c10::BFloat16 provide the conversions instead of cuda_fp16.h), so both
  # builds compile the kernels alike.
  target_compile_definitions(${target} PRIVATE
    TORCHQUANT_WITH_CUDA
    $<$<COMPILE_LANGUAGE:CUDA>:__CUDA_NO_HALF_OPERATORS__;__CUDA_NO_HALF_CONVERSIONS__;__CUDA_NO_BFLOAT16_CONVERSIONS__;__CUDA_NO_HALF2_OPERATORS__>)
  # --fmad=false: no FMA contraction, so the kernels round the element math
  # of quant_math.h exactly as the CPU kernels do (setup.py passes it too).
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr;--fmad=false;-Xcompiler=-Wall,-Wextra;-Xptxas=-warn-spills>
    $<$<COMPILE_LANGUAGE:CXX>:-Wall;-Wextra;-ffp-contract=off>)
endfunction()

if(TORCH_CUDA_LIBRARIES OR CAFFE2_USE_CUDA)
  if(NOT TARGET torchquant)
    message(FATAL_ERROR "cmake/torchquant_cuda.cmake must be included after add_library(torchquant)")
  endif()
  _torchquant_teach_cmake_cuda20()
  _torchquant_add_cuda_objects(torchquant_cuda_objects)
  # torch's gencode flags are in CMAKE_CUDA_FLAGS; CMake adds none of its own.
  set_target_properties(torchquant_cuda_objects PROPERTIES CUDA_ARCHITECTURES OFF)
  target_link_libraries(torchquant PRIVATE torchquant_cuda_objects)
  # One CUDA runtime in the process: the shared one torch itself uses.
  set_target_properties(torchquant PROPERTIES CUDA_RUNTIME_LIBRARY Shared)
  target_compile_definitions(torchquant PUBLIC TORCHQUANT_WITH_CUDA)
  set(TORCHQUANT_WITH_CUDA ON)
  message(STATUS "torchquant: CUDA kernels enabled")
elseif(TORCHQUANT_CUDA_COMPILE_CHECK)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    _torchquant_teach_cmake_cuda20()
    _torchquant_add_cuda_objects(torchquant_cuda_compile_check)
    set_target_properties(torchquant_cuda_compile_check PROPERTIES
      CUDA_ARCHITECTURES "${TORCHQUANT_CUDA_CHECK_ARCHITECTURES}")
    target_compile_definitions(torchquant_cuda_compile_check PRIVATE
      C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
    message(STATUS "torchquant: Torch is a CPU build; compiling the CUDA kernels only as a check "
                   "(${CMAKE_CUDA_COMPILER}, architectures ${TORCHQUANT_CUDA_CHECK_ARCHITECTURES})")
  else()
    message(STATUS "torchquant: Torch is a CPU build and nvcc was not found; CUDA kernels skipped")
  endif()
endif()
