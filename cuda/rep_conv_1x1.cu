// The fused re-parameterized 1x1 conv in training (DESIGN.md, rep_conv "Way 2", src/backend/cuda/
// rep_1x1.rs): NB branches y_b = BN_b(W_b x), W_b [Cout, Cin], plus an optional BN identity
// (Cin == Cout), summed, as ONE 1x1 conv. With xc = x - mu_x (per channel) and Sigma = xc xc^T / M
// (M = N*H*W), branch b's batch mean is W_b mu_x and its variance w_bo^T Sigma w_bo; with
// a_b = gamma_b / sqrt(var_b + eps):
//   y = K xc + sum_b beta_b,   K = sum_b diag(a_b) W_b (+ diag(a_id)),
// computed as one GEMM y = [K | sum beta] [xc; 1] on the centred input with a row of ones.
// Backward with R = gy [xc; 1]^T (its last column is sum gy) and q_b = rowdot(R, W_b):
//   dgamma_b = invstd_b q_b, dbeta_b = sum gy, e_b = a_b invstd_b^2 q_b,
//   dW_b = diag(a_b) R - diag(e_b) W_b Sigma,
//   dx = K^T gy - (Q xc + K^T sum gy) / M,  Q = sum_b W_b^T diag(e_b) W_b (+ diag(e_id)),
// i.e. three activation-sized GEMMs (R, then dx in two accumulating GEMMs) and small kernels.
//
// Cost, GhostNetV3-1.0x at 224, batch 256, the ghost1 primary conv of a 28x28 block
// (Cin 40, Cout 60, NB 3, M = 256*784), floats moved per position (x M x 4 bytes) and FLOPs per
// position (x M); each GEMM counted as reading its inputs and writing its output once:
//   forward  unfused: 3 x (conv 40+60, BN stats 60, BN apply 60+60) + 2 adds x 180 = 1200
//                     floats (963 MB), 3 x 2*40*60 = 14400 FLOPs;
//            fused:   mean 40, centre 40+41, Sigma 40, output GEMM 41+60 = 262 floats (210 MB),
//                     2*40*40 + 2*60*41 = 8120 FLOPs (deploy conv: 4800).
//   backward unfused: 3 x (BN 60+60 and 60+60+60, conv dx 60+40, dW 60+40) + 2 dx sums x 120
//                     = 1740 floats (1.40 GB), 3 x 4*40*60 = 28800 FLOPs;
//            fused:   R 60+41, dx 41+40 and 60+40+40 = 322 floats (259 MB),
//                     2*60*41 + 2*40*41 + 2*40*60 = 13000 FLOPs.
// Sigma costs 2*Cin^2 per position against the branches' 2*NB*Cin*Cout, and x is read about
// five times instead of NB: for a wide input and narrow output (ghost2's primary conv, e.g.
// Cin 960, Cout 80) the unfused branches cost less, and `Rep1x1Geom::fused_pays` says so.

// The mean of x per channel from the partial sums of chan_sum_partial (cuda/elementwise.cu).
extern "C" __global__ void r1_mean_finalize(const double* __restrict__ partial, int S, int C,
                                            double count, double* __restrict__ mean) {
  GS_LOOP(c, C) {
    double s = 0.0;
    for (int j = 0; j < S; ++j) s += partial[c * S + j];
    mean[c] = s / count;
  }
}

// xc [N, C+1, HW]: x - mean (in f64, rounded once) for c < C, then a row of ones.
extern "C" __global__ void r1_center(const float* __restrict__ x, const double* __restrict__ mean,
                                     float* __restrict__ xc, int C, int HW, long long total) {
  GS_LOOP(i, total) {
    const long long t = i / HW, p = i - t * HW;
    const int c = (int)(t % (C + 1));
    const long long n = t / (C + 1);
    xc[i] = c < C ? (float)((double)x[(n * C + c) * HW + p] - mean[c]) : 1.0f;
  }
}

// out[j] = scale * sum_g part[g * len + j] in f64 (the chunk partials of a batched GEMM), and
// the same rounded to f32 into out32 when given.
extern "C" __global__ void r1_sum_parts(const float* __restrict__ part, int G, long long len,
                                        double scale, double* __restrict__ out,
                                        float* __restrict__ out32) {
  GS_LOOP(j, len) {
    double s = 0.0;
    for (int g = 0; g < G; ++g) s += (double)part[g * len + j];
    s *= scale;
    out[j] = s;
    if (out32) out32[j] = (float)s;
  }
}

// Per (branch b, output o), t = b * Cout + o: the batch mean w·mu and variance w·(W Sigma)_o of
// the branch (the identity, b == NB: mu[o] and Sigma[o][o]), invstd and a = gamma * invstd.
extern "C" __global__ void r1_branch_stats(const float* __restrict__ w, const float* __restrict__ ws,
                                           const double* __restrict__ mu,
                                           const double* __restrict__ cov,
                                           const float* __restrict__ gamma, int NB, int has_id,
                                           int Cout, int Cin, double eps,
                                           double* __restrict__ mean, double* __restrict__ var,
                                           double* __restrict__ invstd, double* __restrict__ a) {
  GS_LOOP(t, (long long)(NB + has_id) * Cout) {
    const int b = (int)(t / Cout), o = (int)(t % Cout);
    double m = 0.0, v = 0.0;
    if (b < NB) {
      const float* wr = w + t * Cin;
      const float* sr = ws + t * Cin;
      for (int c = 0; c < Cin; ++c) {
        m += (double)wr[c] * mu[c];
        v += (double)wr[c] * (double)sr[c];
      }
      v = fmax(v, 0.0);
    } else {
      m = mu[o];
      v = cov[(long long)o * Cin + o];
    }
    const double inv = 1.0 / sqrt(v + eps);
    mean[t] = m;
    var[t] = v;
    invstd[t] = inv;
    a[t] = (double)gamma[t] * inv;
  }
}

// K [Cout, Cin] = sum_b a_b[o] W_b[o, :] (+ a_id on the diagonal) and kaug [Cout, Cin+1] =
// [K | sum of the betas], the matrix of the forward GEMM y = kaug [xc; 1].
extern "C" __global__ void r1_fold(const float* __restrict__ w, const double* __restrict__ a,
                                   const float* __restrict__ beta, int NB, int has_id, int Cout,
                                   int Cin, float* __restrict__ k, float* __restrict__ kaug) {
  const int Ca = Cin + 1;
  GS_LOOP(t, (long long)Cout * Ca) {
    const int o = (int)(t / Ca), c = (int)(t % Ca);
    double s = 0.0;
    if (c < Cin) {
      for (int b = 0; b < NB; ++b)
        s += a[b * Cout + o] * (double)w[((long long)b * Cout + o) * Cin + c];
      if (has_id && c == o) s += a[NB * Cout + o];
      k[(long long)o * Cin + c] = (float)s;
    } else {
      for (int b = 0; b < NB + has_id; ++b) s += (double)beta[b * Cout + o];
    }
    kaug[t] = (float)s;
  }
}

// Backward per (b, o) from R [Cout, Cin+1] = sum gy [xc; 1]^T (f64): q = w_bo·R_o (identity:
// R[o][o]), dgamma = invstd q, dbeta = sum gy = R[o][Cin], e = a invstd^2 q.
extern "C" __global__ void r1_bwd_coef(const float* __restrict__ w, const double* __restrict__ r,
                                       const double* __restrict__ invstd,
                                       const double* __restrict__ a, int NB, int has_id, int Cout,
                                       int Cin, float* __restrict__ dgamma,
                                       float* __restrict__ dbeta, double* __restrict__ e) {
  const int Ca = Cin + 1;
  GS_LOOP(t, (long long)(NB + has_id) * Cout) {
    const int b = (int)(t / Cout), o = (int)(t % Cout);
    const double* rr = r + (long long)o * Ca;
    double q = 0.0;
    if (b < NB) {
      const float* wr = w + t * Cin;
      for (int c = 0; c < Cin; ++c) q += (double)wr[c] * rr[c];
    } else {
      q = rr[o];
    }
    const double inv = invstd[t];
    dgamma[t] = (float)(inv * q);
    dbeta[t] = (float)rr[Cin];
    e[t] = a[t] * inv * inv * q;
  }
}

// dW_b = a_b R[:, :Cin] - e_b (W_b Sigma) row-wise, and ew = diag(e_b) W_b for Q = W^T ew.
extern "C" __global__ void r1_bwd_dw(const float* __restrict__ w, const float* __restrict__ ws,
                                     const double* __restrict__ r, const double* __restrict__ a,
                                     const double* __restrict__ e, int NB, int Cout, int Cin,
                                     float* __restrict__ dw, float* __restrict__ ew) {
  GS_LOOP(t, (long long)NB * Cout * Cin) {
    const long long bo = t / Cin;
    const int c = (int)(t - bo * Cin), o = (int)(bo % Cout);
    dw[t] = (float)(a[bo] * r[(long long)o * (Cin + 1) + c] - e[bo] * (double)ws[t]);
    ew[t] = (float)(e[bo] * (double)w[t]);
  }
}

// The matrix A [Cin, Cin+1] of dx = A [xc; 1] + K^T gy: A[:, :Cin] = -(Q + diag(e_id)) / M and
// A[:, Cin] = -(K^T sum gy) / M.
extern "C" __global__ void r1_dx_coef(const float* __restrict__ q, const float* __restrict__ k,
                                      const double* __restrict__ r, const double* __restrict__ e,
                                      int NB, int has_id, int Cout, int Cin, double count,
                                      float* __restrict__ A) {
  const int Ca = Cin + 1;
  GS_LOOP(t, (long long)Cin * Ca) {
    const int c = (int)(t / Ca), j = (int)(t % Ca);
    double s = 0.0;
    if (j < Cin) {
      s = (double)q[(long long)c * Cin + j];
      if (has_id && c == j) s += e[NB * Cout + c];
    } else {
      for (int o = 0; o < Cout; ++o) s += (double)k[(long long)o * Cin + c] * r[(long long)o * Ca + Cin];
    }
    A[t] = (float)(-s / count);
  }
}
