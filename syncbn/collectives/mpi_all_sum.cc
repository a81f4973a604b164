// SyncbnMpiAllSum: the MPI communicator's sum as a TensorFlow CPU kernel.
//
// The same protocol as the mpi4py path in mpi.py, without a trip through
// Python for every collective. One call makes two MPI collectives on the
// communicator whose handle (mpi4py's `MPI._handleof(comm)`) is the `comm`
// attribute, both polled against one deadline:
//
//   1. a header, [fingerprint of the call site, element count, dtype code]
//      (3 int64 per rank, MPI_Iallgather, microseconds): if any rank's header
//      differs, every rank sees every header and fails with the same message,
//      naming this rank's layer and shape and those of the ranks that differ,
//      and no rank starts the data all-reduce (issue #11: mismatched buffers
//      once summed silently);
//   2. the data, MPI_Iallreduce(SUM).
//
// A deadline abandons the job with MPI_Abort, because a pending request
// cannot be cancelled; first the rank writes its error record (the file named
// by SYNCBN_ERROR_FILE, in the format of syncbn/error_file.py), so that the
// launcher names this rank and the collective.
//
// Call-site names: each kernel registers its `call_name` under its fingerprint
// in a process-wide table, and Python registers every name it has seen
// through `syncbn_register_call_site` (extern "C", called with ctypes), so
// that another rank's fingerprint is named whenever that layer exists here.
//
// Built on first use by syncbn/collectives/mpi_op.py with the compiler flags of
// the installed TensorFlow and of `mpicxx`.

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iomanip>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace syncbn {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

constexpr int kTimeoutExitCode = 124;
// Same polling policy as the Python path: spin on MPI_Test first, since the
// other ranks usually arrive within microseconds, then yield between polls.
constexpr double kSpinSeconds = 2e-3;
constexpr auto kPollInterval = std::chrono::microseconds(100);
// Header fields, in this order; mpi.py uses the same layout and dtype codes.
constexpr int kHeaderSize = 3;
constexpr int kMaxRanksNamed = 4;

std::mutex& RegistryMutex() {
  static std::mutex mutex;
  return mutex;
}

std::map<int64_t, std::string>& Registry() {
  static std::map<int64_t, std::string> registry;
  return registry;
}

void Register(int64_t fingerprint, const std::string& name) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Registry()[fingerprint] = name;
}

std::string CallSite(int64_t fingerprint) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  const auto found = Registry().find(fingerprint);
  if (found != Registry().end()) return "'" + found->second + "'";
  char unknown[96];
  std::snprintf(unknown, sizeof(unknown),
                "a call site this rank has not seen (fingerprint %08" PRIx64 ")", fingerprint);
  return unknown;
}

// Codes are TensorFlow's DataType enum values, as `tf.DType.as_datatype_enum`.
std::string DtypeName(int64_t code) {
  switch (code) {
    case 1: return "float32";
    case 2: return "float64";
    case 14: return "bfloat16";
    case 19: return "float16";
    default: return "dtype#" + std::to_string(code);
  }
}

std::string Describe(const int64_t* header) {
  return CallSite(header[0]) + " with " + DtypeName(header[2]) + "[" +
         std::to_string(header[1]) + "]";
}

std::string JsonString(const std::string& text) {
  std::string quoted = "\"";
  for (const unsigned char c : text) {
    if (c == '"' || c == '\\') {
      quoted += '\\';
      quoted += static_cast<char>(c);
    } else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\u%04x", c);
      quoted += escaped;
    } else {
      quoted += static_cast<char>(c);
    }
  }
  return quoted + "\"";
}

// The record syncbn/error_file.py's `record_failure` writes for a collective
// timeout, written aside and linked into place the same way (a reader never sees
// half of it, and a record already there stays). Without the launcher's
// directory (another machine, or the job is over) nothing is written.
void RecordTimeout(const std::string& message) {
  const char* path = std::getenv("SYNCBN_ERROR_FILE");
  if (path == nullptr || *path == '\0') return;
  const char* owner = std::getenv("SYNCBN_ERROR_FILE_OWNER");  // another process's record
  if (owner != nullptr && *owner != '\0' && std::to_string(getpid()) != owner) return;
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  char host[256] = "";
  gethostname(host, sizeof(host) - 1);
  const double now = std::chrono::duration<double>(
      std::chrono::system_clock::now().time_since_epoch()).count();
  std::ostringstream record;
  record << std::fixed << std::setprecision(6) << "{\"rank\": " << rank
         << ", \"host\": " << JsonString(host) << ", \"pid\": " << getpid()
         << ", \"type\": \"syncbn.CollectiveTimeout\", \"message\": " << JsonString(message)
         << ", \"traceback\": \"\", \"time\": " << now
         << ", \"exit_code\": " << kTimeoutExitCode << "}";
  const std::string partial = std::string(path) + ".partial-" + std::to_string(getpid());
  FILE* file = std::fopen(partial.c_str(), "w");
  if (file == nullptr) return;
  std::fputs(record.str().c_str(), file);
  std::fclose(file);
  link(partial.c_str(), path);
  unlink(partial.c_str());
}

REGISTER_OP("SyncbnMpiAllSum")
    .Input("tensor: T")
    .Output("sum: T")
    .Attr("T: {float, double}")
    .Attr("comm: int")
    .Attr("fingerprint: int")
    .Attr("timeout_seconds: float")
    .Attr("call_name: string")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape);

template <typename T>
MPI_Datatype MpiType();
template <>
MPI_Datatype MpiType<float>() { return MPI_FLOAT; }
template <>
MPI_Datatype MpiType<double>() { return MPI_DOUBLE; }

template <typename T>
class MpiAllSumOp : public OpKernel {
 public:
  explicit MpiAllSumOp(OpKernelConstruction* context) : OpKernel(context) {
    tensorflow::int64 handle;
    OP_REQUIRES_OK(context, context->GetAttr("comm", &handle));
    comm_ = reinterpret_cast<MPI_Comm>(static_cast<intptr_t>(handle));
    tensorflow::int64 fingerprint;
    OP_REQUIRES_OK(context, context->GetAttr("fingerprint", &fingerprint));
    fingerprint_ = fingerprint;
    OP_REQUIRES_OK(context, context->GetAttr("timeout_seconds", &timeout_seconds_));
    OP_REQUIRES_OK(context, context->GetAttr("call_name", &call_name_));
    dtype_code_ = static_cast<int64_t>(tensorflow::DataTypeToEnum<T>::value);
    Register(fingerprint_, call_name_);
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& input = context->input(0);
    const auto values = input.flat<T>();
    const int64_t count = values.size();
    int size = 0, rank = 0;
    MPI_Comm_size(comm_, &size);
    MPI_Comm_rank(comm_, &rank);
    const auto deadline =
        std::chrono::steady_clock::now() +
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(timeout_seconds_));

    // [3] -> [size, 3]: every rank's header.
    const int64_t header[kHeaderSize] = {fingerprint_, count, dtype_code_};
    std::vector<int64_t> headers(static_cast<size_t>(size) * kHeaderSize);
    MPI_Request request;
    int status = MPI_Iallgather(header, kHeaderSize, MPI_INT64_T, headers.data(), kHeaderSize,
                                MPI_INT64_T, comm_, &request);
    OP_REQUIRES(context, status == MPI_SUCCESS,
                tensorflow::errors::Internal("syncbn: MPI_Iallgather failed at '",
                                             call_name_, "' with MPI error ", status));
    Wait(&request, deadline);
    std::string mismatch = Mismatch(header, headers, rank, size);
    OP_REQUIRES(context, mismatch.empty(), tensorflow::errors::FailedPrecondition(mismatch));

    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, input.shape(), &output));
    status = MPI_Iallreduce(values.data(), output->flat<T>().data(), static_cast<int>(count),
                            MpiType<T>(), MPI_SUM, comm_, &request);
    OP_REQUIRES(context, status == MPI_SUCCESS,
                tensorflow::errors::Internal("syncbn: MPI_Iallreduce failed at '",
                                             call_name_, "' with MPI error ", status));
    Wait(&request, deadline);
  }

 private:
  // The error message when some rank's header differs from this rank's, else "".
  static std::string Mismatch(const int64_t* own, const std::vector<int64_t>& headers,
                              int rank, int size) {
    std::ostringstream others;
    int named = 0, differing = 0;
    for (int other = 0; other < size; ++other) {
      const int64_t* theirs = headers.data() + static_cast<size_t>(other) * kHeaderSize;
      if (std::equal(own, own + kHeaderSize, theirs)) continue;
      if (++differing > kMaxRanksNamed) continue;
      others << (named++ ? "; " : "") << "rank " << other << " is at " << Describe(theirs);
    }
    if (!differing) return "";
    if (differing > kMaxRanksNamed) others << "; and " << differing - kMaxRanksNamed << " more";
    std::ostringstream message;
    message << "syncbn: ranks disagree at a sync BN collective: this rank (" << rank
            << ") is at " << Describe(own) << "; " << others.str()
            << ". Every rank must call the same SyncBatchNormalization layers, in the same "
               "order, with the same number of channels and dtype.";
    return message.str();
  }

  void Wait(MPI_Request* request, std::chrono::steady_clock::time_point deadline) {
    using Clock = std::chrono::steady_clock;
    const auto spin_until = Clock::now() + std::chrono::duration<double>(kSpinSeconds);
    int done = 0;
    MPI_Test(request, &done, MPI_STATUS_IGNORE);
    while (!done) {
      const auto now = Clock::now();
      if (now > deadline) {
        char seconds[32];
        std::snprintf(seconds, sizeof(seconds), "%.0f", timeout_seconds_);
        const std::string message =
            "syncbn: MPI all-reduce '" + call_name_ + "' waited more than " + seconds +
            " s (SYNCBN_COLLECTIVE_TIMEOUT) for the other ranks; one of them has died or "
            "is stuck. Aborting the MPI job.";
        std::fprintf(stderr, "%s\n", message.c_str());
        std::fflush(stderr);
        RecordTimeout(message);
        MPI_Abort(comm_, kTimeoutExitCode);
      }
      if (now > spin_until) {
        std::this_thread::sleep_for(kPollInterval);
      } else {
        std::this_thread::yield();
      }
      MPI_Test(request, &done, MPI_STATUS_IGNORE);
    }
  }

  MPI_Comm comm_;
  int64_t fingerprint_;
  int64_t dtype_code_;
  float timeout_seconds_;
  std::string call_name_;
};

REGISTER_KERNEL_BUILDER(
    Name("SyncbnMpiAllSum").Device(DEVICE_CPU).TypeConstraint<float>("T"),
    MpiAllSumOp<float>);
REGISTER_KERNEL_BUILDER(
    Name("SyncbnMpiAllSum").Device(DEVICE_CPU).TypeConstraint<double>("T"),
    MpiAllSumOp<double>);

}  // namespace syncbn

// Lets Python name call sites that this rank has traced but not yet run.
extern "C" void syncbn_register_call_site(int64_t fingerprint, const char* name) {
  syncbn::Register(fingerprint, name);
}
