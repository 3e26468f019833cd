// The login page: sends the token once; the service sets it as an HttpOnly cookie.
const form = document.getElementById("login");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const answer = await fetch("/api/cairn/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: document.getElementById("token").value }),
  });
  if (answer.ok) {
    window.location.assign("/");
  } else {
    const body = await answer.json().catch(() => ({}));
    document.getElementById("login-error").textContent = body.error || answer.statusText;
  }
});
